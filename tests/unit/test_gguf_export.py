"""GGUF export: the files read back with ``gguf``'s reader hold the Llama tensors (f16, q8_0, the
LoRA), the tokenizer, the chat template and the stop tokens, and their numbers are the merged
model's; the Modelfile's Go template renders conversations as the Jinja template does."""

from __future__ import annotations

import json
import re

import gguf
import numpy as np
import pytest
from safetensors.numpy import load_file

from loraforge.adapters.format import read_manifest
from loraforge.adapters.gguf_convert import (
    F16_FILE,
    LORA_FILE,
    MODELFILE,
    Q8_FILE,
    GgufExportError,
    convert,
    ollama_template,
)
from loraforge.adapters.merge import merge
from loraforge.catalog import load_catalog
from tests.unit.lora_helpers import BASE, train_adapter


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    entry = load_catalog().get(BASE)
    models_dir = tmp_path_factory.mktemp("models")
    adapter_dir = tmp_path_factory.mktemp("adapters") / "a"
    train_adapter(entry, models_dir, adapter_dir)
    merged = merge(adapter_dir, tmp_path_factory.mktemp("m") / "merged", models_dir=models_dir, device="cpu")
    out = tmp_path_factory.mktemp("gguf")
    convert(merged, adapter_dir, out, name="ft:tiny:acme:x:1")
    return adapter_dir, merged, out


def field(reader: gguf.GGUFReader, key: str):  # type: ignore[no-untyped-def]
    return reader.fields[key].contents()


def go_render(template: str, messages: list[dict[str, str]]) -> str:
    """The subset of Go's text/template the exported TEMPLATE uses (range, if/else if eq .Role)."""
    head, body, tail = re.fullmatch(
        r"(.*?)\{\{- range \.Messages \}\}(.*)\{\{- end \}\}\{\{- end \}\}(.*)", template, re.S
    ).groups()  # type: ignore[union-attr]  # noqa: E501
    branches = dict(re.findall(r'if eq \.Role "(\w+)" \}\}(.*?)(?=\{\{- else|$)', body, re.S))
    out = head
    for message in messages:
        out += branches[message["role"]].replace("{{ .Content }}", message["content"])
    return out + tail


@pytest.mark.slow
def test_model_files_hold_tensors_tokenizer_template_and_stops(exported):
    adapter_dir, merged, out = exported
    manifest = read_manifest(adapter_dir)
    weights = load_file(str(merged / "model.safetensors"))
    config = json.loads((merged / "config.json").read_text())
    for name, kind in ((F16_FILE, gguf.GGMLQuantizationType.F16), (Q8_FILE, gguf.GGMLQuantizationType.Q8_0)):
        reader = gguf.GGUFReader(out / name)
        assert field(reader, "general.architecture") == "llama"
        assert field(reader, "llama.block_count") == config["num_hidden_layers"] == 2
        assert field(reader, "llama.attention.head_count_kv") == config["num_key_value_heads"]
        tensors = {t.name: t for t in reader.tensors}
        assert len(tensors) == len(weights) == 2 * 9 + 3
        assert {"token_embd.weight", "output_norm.weight", "output.weight", "blk.1.ffn_down.weight"} <= set(
            tensors
        )
        assert tensors["blk.0.attn_q.weight"].tensor_type == kind
        assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
        # Numbers: the down projection is the merged one (to f16 / q8_0 precision).
        down = gguf.dequantize(tensors["blk.1.ffn_down.weight"].data, kind).reshape(128 // 2, -1)
        expected = weights["model.layers.1.mlp.down_proj.weight"]
        assert down.shape == expected.shape
        assert (
            np.abs(down - expected).max()
            < (1e-3 if kind == gguf.GGMLQuantizationType.F16 else 2e-2) * np.abs(expected).max()
        )
        # q is permuted to GGUF's rotary layout: rows re-ordered within each head, not changed.
        q = gguf.dequantize(tensors["blk.0.attn_q.weight"].data, kind).reshape(64, 64)
        q_hf = weights["model.layers.0.self_attn.q_proj.weight"]
        assert not np.allclose(q, q_hf, atol=1e-2)
        per_head = q_hf.reshape(4, 2, 8, 64).swapaxes(1, 2).reshape(64, 64)
        assert np.allclose(q, per_head, atol=2e-2 * np.abs(q_hf).max())
        # Tokenizer, template, stops.
        tokens = [
            bytes(reader.fields["tokenizer.ggml.tokens"].parts[i]).decode()
            for i in reader.fields["tokenizer.ggml.tokens"].data
        ]
        assert len(tokens) == config["vocab_size"] == 1024
        assert field(reader, "tokenizer.ggml.model") == "gpt2"
        assert len(field(reader, "tokenizer.ggml.merges")) > 100
        assert field(reader, "tokenizer.chat_template") == manifest.chat_template
        assert tokens[field(reader, "tokenizer.ggml.eos_token_id")] == manifest.stop_tokens[0] == "<|eot_id|>"
        assert tokens[field(reader, "tokenizer.ggml.bos_token_id")] == "<|begin_of_text|>"
    assert (out / Q8_FILE).stat().st_size < 0.7 * (out / F16_FILE).stat().st_size


@pytest.mark.slow
def test_lora_file_is_the_peft_adapter(exported):
    adapter_dir, _, out = exported
    reader = gguf.GGUFReader(out / LORA_FILE)
    assert field(reader, "general.type") == "adapter" and field(reader, "adapter.type") == "lora"
    lora_config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert field(reader, "adapter.lora.alpha") == pytest.approx(lora_config["lora_alpha"])
    peft = load_file(str(adapter_dir / "adapter_model.safetensors"))
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == len(peft) == 2 * 7 * 2
    a = tensors["blk.1.ffn_up.weight.lora_a"]
    expected = peft["base_model.model.model.layers.1.mlp.up_proj.lora_A.weight"]
    assert np.array_equal(np.asarray(a.data).reshape(expected.shape), expected)
    b_k = np.asarray(tensors["blk.0.attn_k.weight.lora_b"].data)
    k_hf = peft["base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"]  # (32, r), 2 kv heads
    assert np.array_equal(
        b_k.reshape(k_hf.shape), k_hf.reshape(2, 2, 8, -1).swapaxes(1, 2).reshape(k_hf.shape)
    )


@pytest.mark.slow
def test_modelfile_template_renders_like_the_jinja_one(exported):
    from transformers import AutoTokenizer

    _, merged, out = exported
    text = (out / MODELFILE).read_text()
    assert text.startswith(f"FROM ./{Q8_FILE}\n")
    assert 'PARAMETER stop "<|eot_id|>"' in text
    template = re.search(r'TEMPLATE """(.*?)"""', text, re.S).group(1)  # type: ignore[union-attr]
    tok = AutoTokenizer.from_pretrained(merged)
    conversation = [
        {"role": "system", "content": "Reply with JSON."},
        {"role": "user", "content": "Ticket 4: late"},
        {"role": "assistant", "content": '{"label": "shipping"}'},
        {"role": "user", "content": "And ticket 5?"},
    ]
    jinja = tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    assert go_render(template, conversation) == jinja


def test_what_gguf_cannot_express_is_refused(tmp_path) -> None:
    from loraforge.adapters.gguf_convert import _hparams

    llama = {"model_type": "llama", "num_attention_heads": 4, "hidden_size": 64}
    assert _hparams(llama)["head_dim"] == 16
    with pytest.raises(GgufExportError, match="only Llama"):
        _hparams({**llama, "model_type": "qwen2"})
    with pytest.raises(GgufExportError, match="llama3"):
        _hparams({**llama, "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}})


def test_a_template_that_is_not_per_message_gets_no_go_template() -> None:
    # A template that joins all contents into one block: no role prefixes to read off.
    def joined(messages, generation):  # type: ignore[no-untyped-def]
        return "<s>" + " | ".join(m["content"] for m in messages) + (" >>" if generation else "")

    assert ollama_template(joined) is None
