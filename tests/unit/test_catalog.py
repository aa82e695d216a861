"""The model catalog and the offline, deterministic tiny-llama build."""

from __future__ import annotations

import hashlib
from pathlib import Path

from loraforge.catalog import load_catalog
from loraforge.catalog.loading import load_tokenizer
from loraforge.catalog.tiny_llama import build_tiny_llama


def test_catalog_ids_aliases_and_templates() -> None:
    catalog = load_catalog()
    eight_b = catalog.get("meta-llama/Llama-3.1-8B-Instruct")
    assert eight_b is not None and eight_b.id == "klusterai/Meta-Llama-3.1-8B-Instruct-Turbo"
    assert (
        catalog.get("meta-llama/Llama-3.3-70B-Instruct").id == "klusterai/Meta-Llama-3.3-70B-Instruct-Turbo"
    )
    tiny = catalog.get("loraforge/tiny-llama")
    assert tiny.weights == "builtin:tiny-llama" and "{% generation %}" in tiny.chat_template_text.replace(
        "{%- generation %}", "{% generation %}"
    )
    assert catalog.get("nope") is None


def _digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def test_tiny_llama_build_is_deterministic_and_has_llama3_tokens(tmp_path: Path) -> None:
    entry = load_catalog().get("loraforge/tiny-llama")
    first = build_tiny_llama(tmp_path / "a", entry.chat_template_text)
    second = build_tiny_llama(tmp_path / "b", entry.chat_template_text)
    assert _digest(first) == _digest(second)
    assert (first / "model.safetensors").stat().st_size < 2_000_000

    tok = load_tokenizer(entry, tmp_path / "models")
    enc = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": '{"ok": true}'}],
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    ids, mask = enc["input_ids"], enc["assistant_masks"]
    assert ids[0] == tok.convert_tokens_to_ids("<|begin_of_text|>")
    trained = tok.decode([i for i, m in zip(ids, mask, strict=True) if m])
    assert trained == '{"ok": true}<|eot_id|>'
