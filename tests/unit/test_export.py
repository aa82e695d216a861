"""Export: the PEFT tar reloads with ``PeftModel.from_pretrained`` and reproduces the served output;
its ``adapter_config.json`` holds only what vLLM's loader reads; merged weights answer the same."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from loraforge.adapters.export import (
    AdapterExportError,
    TarEntry,
    peft_export,
    serving_problems,
    tar_stream,
    vllm_adapter_config,
)
from loraforge.adapters.format import read_manifest
from loraforge.adapters.merge import merge
from loraforge.catalog import load_catalog
from loraforge.catalog.loading import load_model, load_tokenizer
from loraforge.serving.engine import Engine
from tests.unit.lora_helpers import ANSWER, BASE, PROMPT, train_adapter

NAME = "ft:loraforge/tiny-llama:acme:tickets:abcd1234"
# Every key vLLM's PEFTHelper reads, plus the PEFT keys it ignores harmlessly.
VLLM_KEYS = {"r", "lora_alpha", "target_modules", "bias", "modules_to_save", "use_rslora", "use_dora"}
PEFT_KEYS = {
    "peft_type", "task_type", "base_model_name_or_path", "lora_dropout", "fan_in_fan_out",
    "init_lora_weights", "inference_mode", "layers_to_transform", "layers_pattern", "rank_pattern",
    "alpha_pattern", "revision", "peft_version",
}  # fmt: skip
QUESTIONS = [PROMPT, [{"role": "user", "content": "Where is my package? It is late."}]]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The adapter, and what the engine answers with it (token ids) for each question."""
    entry = load_catalog().get(BASE)
    models_dir = tmp_path_factory.mktemp("models")
    adapter_dir = tmp_path_factory.mktemp("adapters") / "refund"
    train_adapter(entry, models_dir, adapter_dir)
    engine = Engine(load_model(entry, models_dir), load_tokenizer(entry, models_dir), entry)
    engine.load_adapter(NAME, adapter_dir)
    answers = [engine.generate(NAME, q, temperature=0, max_tokens=40) for q in QUESTIONS]
    engine.close()
    assert answers[0].text == ANSWER
    return entry, models_dir, adapter_dir, answers


def _untar(chunks, dest: Path) -> list[str]:
    data = b"".join(chunks)
    assert len(data) % 512 == 0
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        names = tar.getnames()
        tar.extractall(dest, filter="data")
    return names


def test_peft_export_reloads_and_reproduces_the_served_output(served, tmp_path):
    entry, models_dir, adapter_dir, answers = served
    names = _untar(tar_stream(peft_export(adapter_dir, read_manifest(adapter_dir), entry, NAME)), tmp_path)
    root = "ft-loraforge-tiny-llama-acme-tickets-abcd1234"
    assert sorted(names) == sorted(
        f"{root}/{f}"
        for f in (
            "adapter_config.json",
            "adapter_model.safetensors",
            "manifest.json",
            "chat_template.jinja",
            "README.md",
        )
    )
    exported = tmp_path / root
    config = json.loads((exported / "adapter_config.json").read_text())
    assert set(config) <= VLLM_KEYS | PEFT_KEYS and VLLM_KEYS - {"bias"} <= set(config)
    assert config["target_modules"] == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    assert config["base_model_name_or_path"] == BASE and config["use_dora"] is False
    assert config["modules_to_save"] is None and config["bias"] == "none"
    assert (exported / "adapter_model.safetensors").read_bytes() == (
        adapter_dir / "adapter_model.safetensors"
    ).read_bytes()

    # What a user does with the download: base + PeftModel.from_pretrained + the shipped template.
    tok = load_tokenizer(entry, models_dir)
    model = PeftModel.from_pretrained(load_model(entry, models_dir), str(exported)).eval()
    template = (exported / "chat_template.jinja").read_text()
    for question, answer in zip(QUESTIONS, answers, strict=True):
        enc = tok.apply_chat_template(
            question,
            chat_template=template,
            add_generation_prompt=True,
            return_dict=True,
            return_tensors="pt",
        )
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=40, do_sample=False)
        assert out[0, enc["input_ids"].shape[1] :].tolist() == list(answer.token_ids)


def test_merged_weights_answer_like_the_served_adapter(served, tmp_path):
    entry, models_dir, adapter_dir, answers = served
    out = merge(adapter_dir, tmp_path / "merged", models_dir=models_dir, device="cpu")
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert (out / "manifest.json").is_file()
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any("lora" in n for n, _ in model.named_parameters())
    for question, answer in zip(QUESTIONS, answers, strict=True):
        enc = tok.apply_chat_template(
            question, add_generation_prompt=True, return_dict=True, return_tensors="pt"
        )
        with torch.inference_mode():
            ids = model.generate(**enc, max_new_tokens=40, do_sample=False)[0, enc["input_ids"].shape[1] :]
        assert ids.tolist() == list(answer.token_ids)


def test_normalisation_refuses_what_vllm_would_serve_differently(served):
    entry = served[0]
    base = json.loads((served[2] / "adapter_config.json").read_text())
    assert serving_problems(base, entry.serving) == []
    for change, needle in [
        ({"rank_pattern": {"q_proj": 4}}, "rank_pattern"),
        ({"use_dora": True}, "DoRA"),
        ({"lora_bias": True}, "bias"),
        ({"r": 65}, "max_lora_rank"),
        ({"target_modules": ".*proj"}, "regular expression"),
    ]:
        with pytest.raises(AdapterExportError, match=needle):
            vllm_adapter_config({**base, **change}, entry)


def test_tar_stream_chunks_big_files(tmp_path):
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(2_500_001))
    chunks = list(tar_stream([TarEntry("d/big.bin", path=big), TarEntry("d/x.txt", data=b"hi")], mtime=0))
    assert max(len(c) for c in chunks) <= 1024 * 1024
    _untar(chunks, tmp_path / "out")
    assert (tmp_path / "out/d/big.bin").read_bytes() == big.read_bytes()
    assert (tmp_path / "out/d/x.txt").read_text() == "hi"
