"""The engine refuses prompts that cannot fit the context before tokenizing them, and bodies over
its byte limit before parsing them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from loraforge.catalog import load_catalog
from loraforge.catalog.loading import load_model, load_tokenizer
from loraforge.serving.app import create_engine_app
from loraforge.serving.chat import max_prompt_chars
from loraforge.serving.engine import Engine
from loraforge.serving.errors import InvalidRequest

BASE = "loraforge/tiny-llama"


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    entry = load_catalog().get(BASE)
    assert entry is not None
    models: Path = tmp_path_factory.mktemp("models")
    return Engine(load_model(entry, models), load_tokenizer(entry, models), entry)


class CountingTokenizer:
    """The engine's tokenizer, counting how often a chat template is rendered and tokenized."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.calls = inner, 0

    def apply_chat_template(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self.inner.apply_chat_template(*args, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_the_bound_never_refuses_what_fits(engine: Engine) -> None:
    tokenizer = engine._tokenizer
    vocab = tokenizer.get_vocab()
    longest = max(len(t) for t in vocab)
    # Texts that tokenize into few, long tokens: the bound is chars / tokens <= longest entry.
    for text in ["a" * 5000, " " * 5000, "ab" * 3000, "the quick brown fox " * 300, "é" * 2000]:
        tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        assert len(text) <= tokens * longest
    assert max_prompt_chars(vocab, 100) == 100 * longest


def test_a_huge_prompt_is_refused_without_tokenizing(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    counting = CountingTokenizer(engine._tokenizer)
    monkeypatch.setattr(engine, "_tokenizer", counting)
    limit = engine._max_prompt_chars
    huge = [{"role": "user", "content": "x" * (limit + 1)}]
    with pytest.raises(InvalidRequest) as exc:
        engine.prepare(BASE, huge)
    assert exc.value.code == "context_length_exceeded" and exc.value.param == "messages"
    assert "maximum context length is" in exc.value.message
    assert counting.calls == 0
    # Under the character bound but over the context: the exact token count decides.
    context = engine.entry.context_length
    long = [{"role": "user", "content": "hello world " * context}]
    assert len(long[0]["content"]) <= limit
    with pytest.raises(InvalidRequest) as exact:
        engine.prepare(BASE, long)
    assert exact.value.code == "context_length_exceeded" and counting.calls == 1
    assert engine.prepare(BASE, [{"role": "user", "content": "hi"}]).input_ids


def test_the_engine_limits_request_bodies(engine: Engine) -> None:
    client = TestClient(create_engine_app(engine, max_request_bytes=2048))
    body = {"model": BASE, "messages": [{"role": "user", "content": "x" * 4096}]}
    resp = client.post("/v1/chat/completions", json=body)
    assert resp.status_code == 413, resp.text
    assert resp.json()["error"]["code"] == "request_too_large"
    nan = client.post(
        "/v1/chat/completions",
        content='{"model": "loraforge/tiny-llama", "messages": [], "temperature": NaN}',
        headers={"content-type": "application/json"},
    )
    assert nan.status_code == 400 and nan.json()["error"]["param"] == "temperature"
