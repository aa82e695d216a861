"""``python -m loraforge.adapters.gguf_convert MERGED_DIR ADAPTER_DIR OUT_DIR``: GGUF files for
llama.cpp, Ollama and LM Studio.

Runs in its own process, like the merge (it reads the weights with torch; the API never does).
Writes into OUT_DIR:

* ``model-f16.gguf`` and ``model-q8_0.gguf``: the merged weights (norms stay f32, as llama.cpp's
  converter keeps them; a matrix whose rows do not split into q8_0 blocks of 32 stays f16);
* ``lora-f32.gguf``: the LoRA alone, for ``llama-cli -m BASE.gguf --lora lora-f32.gguf``;
* ``Modelfile``: ``ollama create NAME -f Modelfile`` (the q8_0 file, the chat template as a Go
  template, the stop tokens).

Every model file carries the tokenizer (byte-level BPE: tokens, types, merges, special ids), the
chat template the adapter was trained and is served with (``tokenizer.chat_template``) and the
stop tokens (``eos``/``eot`` ids), so the exported model chats as the served one does.

Tensor names come from ``gguf``'s ``TensorNameMap``; Llama's q and k projections are permuted
from Hugging Face's rotary layout to GGUF's, as llama.cpp's ``convert_hf_to_gguf.py`` does (for the
LoRA, the permutation applies to ``lora_B``, the output side). Only the Llama architecture with
plain RoPE is exported (``GgufExportError`` otherwise).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from loraforge.adapters.export import AdapterExportError, lora_modules, serving_problems
from loraforge.adapters.format import ADAPTER_CONFIG, ADAPTER_WEIGHTS, validate_adapter_dir
from loraforge.adapters.gguf_export import F16_FILE, LORA_FILE, MODELFILE, Q8_FILE

_ARCH = gguf.MODEL_ARCH.LLAMA
_MARKS = ("\x01SYSTEM\x01", "\x01USER\x01", "\x01ASSISTANT\x01", "\x01USER2\x01")


class GgufExportError(ValueError):
    """The model cannot be written as GGUF."""


def _permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp's LlamaModel.permute: HF's half-split rotary layout -> interleaved pairs.
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _hparams(config: dict[str, Any]) -> dict[str, Any]:
    if config.get("model_type") != "llama":
        raise GgufExportError(
            f"only Llama-architecture models are exported as GGUF, not {config.get('model_type')}"
        )
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", "default") not in ("default", None):
        raise GgufExportError(f"RoPE scaling {rope.get('rope_type')!r} is not exported as GGUF yet")
    n_head = int(config["num_attention_heads"])
    return {
        "n_head": n_head,
        "n_head_kv": int(config.get("num_key_value_heads") or n_head),
        "hidden": int(config["hidden_size"]),
        "head_dim": int(config.get("head_dim") or config["hidden_size"] // n_head),
        "rope_theta": float(rope.get("rope_theta") or config.get("rope_theta") or 10000.0),
    }


def _load_tensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors import safe_open  # torch framework: reads bf16 too

    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    out: dict[str, np.ndarray] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as fh:
            for name in fh.keys():  # noqa: SIM118 - safe_open is not a mapping
                out[name] = fh.get_tensor(name).float().numpy()
    return out


def _gguf_name(names: gguf.TensorNameMap, hf_name: str) -> str:
    found = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if found is None:
        raise GgufExportError(f"no GGUF name for tensor {hf_name}")
    return str(found)


def _vocab(model_dir: Path, vocab_size: int) -> dict[str, Any]:
    """Tokens, types and merges of a byte-level BPE ``tokenizer.json``."""
    data = json.loads((model_dir / "tokenizer.json").read_text())
    model = data["model"]
    if model.get("type") != "BPE":
        raise GgufExportError(f"only byte-level BPE tokenizers are exported as GGUF, not {model.get('type')}")
    by_id = {int(i): t for t, i in model["vocab"].items()}
    special = {int(t["id"]) for t in data.get("added_tokens", []) if t.get("special")}
    for added in data.get("added_tokens", []):
        by_id[int(added["id"])] = added["content"]
    tokens, types = [], []
    for i in range(max(vocab_size, len(by_id))):
        if i in by_id:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL)
        else:  # padding rows of the embedding, as llama.cpp's converter names them
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    pre = json.dumps(data.get("pre_tokenizer"))
    # The GPT-2 split regex (a plain ByteLevel pre-tokenizer) or Llama 3's (a Split then ByteLevel).
    pre_name = "llama-bpe" if "Split" in pre and "\\p{N}{1,3}" in pre else "gpt-2"
    return {"tokens": tokens, "types": types, "merges": merges, "pre": pre_name}


def _token_ids(tokens: list[str], wanted: list[str]) -> list[int]:
    index = {t: i for i, t in enumerate(tokens)}
    return [index[t] for t in wanted if t in index]


def _metadata(
    writer: gguf.GGUFWriter, name: str, config: dict[str, Any], hp: dict[str, Any], vocab: dict[str, Any]
) -> None:
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_context_length(int(config.get("max_position_embeddings") or 2048))
    writer.add_embedding_length(hp["hidden"])
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(hp["n_head"])
    writer.add_head_count_kv(hp["n_head_kv"])
    writer.add_rope_dimension_count(hp["head_dim"])
    writer.add_rope_freq_base(hp["rope_theta"])
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps") or 1e-5))
    writer.add_vocab_size(len(vocab["tokens"]))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab["pre"])
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["types"])
    writer.add_token_merges(vocab["merges"])
    if vocab["bos"] is not None:
        writer.add_bos_token_id(vocab["bos"])
        writer.add_add_bos_token(vocab["add_bos"])
    if vocab["stop_ids"]:
        # The first stop token ends generation in llama.cpp (eos and end-of-turn); the Modelfile
        # lists all of them for Ollama.
        writer.add_eos_token_id(vocab["stop_ids"][0])
        writer.add_eot_token_id(vocab["stop_ids"][0])
    if vocab["pad"] is not None:
        writer.add_pad_token_id(vocab["pad"])
    writer.add_chat_template(vocab["chat_template"])


def _write_model(
    path: Path,
    qtype: gguf.GGMLQuantizationType,
    tensors: dict[str, np.ndarray],
    meta: tuple[str, dict[str, Any], dict[str, Any], dict[str, Any]],
) -> None:
    name, config, hp, vocab = meta
    writer = gguf.GGUFWriter(str(path), _ARCH_NAME)
    _metadata(writer, name, config, hp, vocab)
    writer.add_file_type(
        gguf.LlamaFileType.MOSTLY_Q8_0
        if qtype == gguf.GGMLQuantizationType.Q8_0
        else gguf.LlamaFileType.MOSTLY_F16
    )
    for tname, data in tensors.items():
        if data.ndim == 1:
            writer.add_tensor(tname, data.astype(np.float32))
        elif qtype == gguf.GGMLQuantizationType.Q8_0 and data.shape[-1] % 32 == 0:
            writer.add_tensor(tname, gguf.quantize(data, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(tname, data.astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


_ARCH_NAME = gguf.MODEL_ARCH_NAMES[_ARCH]


def _model_tensors(merged_dir: Path, config: dict[str, Any], hp: dict[str, Any]) -> dict[str, np.ndarray]:
    names = gguf.get_tensor_name_map(_ARCH, int(config["num_hidden_layers"]))
    out = {}
    for hf_name, data in _load_tensors(merged_dir).items():
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        if hf_name.endswith("q_proj.weight"):
            data = _permute(data, hp["n_head"])
        elif hf_name.endswith("k_proj.weight"):
            data = _permute(data, hp["n_head_kv"])
        out[_gguf_name(names, hf_name)] = data
    return out


def _write_lora(adapter_dir: Path, path: Path, name: str, config: dict[str, Any], hp: dict[str, Any]) -> int:
    from loraforge.catalog.catalog import ServingTarget

    lora_config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    # What llama.cpp's LoRA can express is what vLLM's can: plain LoRA, no bias, no DoRA.
    unlimited = ServingTarget(max_lora_rank=1 << 20, target_modules=lora_modules(lora_config))
    problems = serving_problems(lora_config, unlimited)
    if problems:
        raise AdapterExportError("; ".join(problems))
    rank, alpha = int(lora_config["r"]), float(lora_config["lora_alpha"])
    if lora_config.get("use_rslora"):  # llama.cpp scales by alpha / r; rsLoRA by alpha / sqrt(r)
        alpha *= math.sqrt(rank)
    names = gguf.get_tensor_name_map(_ARCH, int(config["num_hidden_layers"]))
    writer = gguf.GGUFWriter(str(path), _ARCH_NAME)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_name(name)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    count = 0
    for key, data in sorted(_load_tensors(adapter_dir / ADAPTER_WEIGHTS).items()):
        module, _, part = key.removeprefix("base_model.model.").rpartition(".lora_")
        if not part:
            raise GgufExportError(f"unexpected tensor {key} in the adapter")
        if part.startswith("B") and module.endswith(("q_proj", "k_proj")):
            data = _permute(data, hp["n_head"] if module.endswith("q_proj") else hp["n_head_kv"])
        suffix = ".lora_a" if part.startswith("A") else ".lora_b"
        writer.add_tensor(_gguf_name(names, module + ".weight") + suffix, data.astype(np.float32))
        count += 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return count


def ollama_template(render: Any) -> str | None:
    """The chat template as an Ollama Go template, or None when it is not a per-message template.

    ``render(messages, add_generation_prompt)`` renders the Jinja template. Each role's text
    around its content is read off renders of marker conversations, so the Go template produces
    what the Jinja one does for system, user and assistant turns.
    """
    sys_m, user_m, asst_m, user2_m = _MARKS
    try:
        one = render([{"role": "user", "content": user_m}], False)
        turn = render([{"role": "user", "content": user_m}, {"role": "assistant", "content": asst_m}], False)
        three = render(
            [
                {"role": "user", "content": user_m},
                {"role": "assistant", "content": asst_m},
                {"role": "user", "content": user2_m},
            ],
            False,
        )
        gen = render([{"role": "user", "content": user_m}], True)
        with_sys = render([{"role": "system", "content": sys_m}, {"role": "user", "content": user_m}], False)
    except Exception:  # noqa: BLE001 - a template that refuses these conversations: no Go template
        return None
    head, user_post = one.split(user_m)
    if (
        not turn.startswith(one)
        or not gen.startswith(one)
        or not three.startswith(turn[: turn.index(asst_m)])
    ):
        return None
    asst_pre, asst_post = turn[len(one) :].split(asst_m)
    user_pre = three[len(turn) : three.index(user2_m)]
    if not head.endswith(user_pre) or sys_m not in with_sys:
        return None
    begin = head[: len(head) - len(user_pre)]
    sys_pre, rest = with_sys.split(sys_m)
    if not sys_pre.startswith(begin) or not rest.endswith(user_pre + user_m + user_post):
        return None
    sys_pre, sys_post = sys_pre[len(begin) :], rest[: len(rest) - len(user_pre + user_m + user_post)]
    return (
        begin
        + "{{- range .Messages }}"
        + f'{{{{- if eq .Role "system" }}}}{sys_pre}{{{{ .Content }}}}{sys_post}'
        + f'{{{{- else if eq .Role "user" }}}}{user_pre}{{{{ .Content }}}}{user_post}'
        + f'{{{{- else if eq .Role "assistant" }}}}{asst_pre}{{{{ .Content }}}}{asst_post}'
        + "{{- end }}{{- end }}"
        + gen[len(one) :]
    )


def modelfile(template: str | None, stop_tokens: list[str], gguf_file: str = Q8_FILE) -> str:
    """An Ollama ``Modelfile`` for ``gguf_file`` in the same directory."""
    lines = [f"FROM ./{gguf_file}"]
    if template is not None and '"""' not in template:
        lines.append(f'TEMPLATE """{template}"""')
    lines += [f"PARAMETER stop {json.dumps(token)}" for token in stop_tokens]
    return "\n".join(lines) + "\n"


def convert(merged_dir: Path, adapter_dir: Path, out_dir: Path, *, name: str) -> list[Path]:
    """Write the GGUF files and the Modelfile of a merged model and its adapter into ``out_dir``.

    Args:
        merged_dir: the merged model (``loraforge.adapters.merge``): config, weights, tokenizer.
        adapter_dir: the adapter it was merged from (its manifest gives template and stop tokens).
        out_dir: created; the files are written there.
        name: ``general.name`` of the files (the fine-tuned model's name).

    Returns:
        The files written.

    Raises:
        GgufExportError: the architecture, RoPE scaling or tokenizer is not exportable.
        AdapterExportError: the LoRA uses what llama.cpp's LoRA cannot express.
    """
    from transformers import AutoTokenizer

    manifest = validate_adapter_dir(adapter_dir)
    config = json.loads((merged_dir / "config.json").read_text())
    hp = _hparams(config)
    tokenizer = AutoTokenizer.from_pretrained(str(merged_dir))
    template = manifest.chat_template if "{" in manifest.chat_template else str(tokenizer.chat_template)
    vocab = _vocab(merged_dir, int(config["vocab_size"]))
    bos = tokenizer.bos_token
    vocab |= {
        "bos": _token_ids(vocab["tokens"], [bos])[0] if bos in vocab["tokens"] else None,
        # Does the tokenizer put BOS in front by itself (its post-processor)?
        "add_bos": bool(tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]) if bos else False,
        "pad": tokenizer.pad_token_id,
        "stop_ids": _token_ids(vocab["tokens"], manifest.stop_tokens),
        "chat_template": template,
    }
    tensors = _model_tensors(merged_dir, config, hp)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = (name, config, hp, vocab)
    _write_model(out_dir / F16_FILE, gguf.GGMLQuantizationType.F16, tensors, meta)
    _write_model(out_dir / Q8_FILE, gguf.GGMLQuantizationType.Q8_0, tensors, meta)
    _write_lora(adapter_dir, out_dir / LORA_FILE, name, config, hp)

    def render(messages: list[dict[str, str]], generation: bool) -> str:
        text = tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=generation
        )
        return str(text)

    (out_dir / MODELFILE).write_text(modelfile(ollama_template(render), manifest.stop_tokens))
    return [out_dir / f for f in (F16_FILE, Q8_FILE, LORA_FILE, MODELFILE)]


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m loraforge.adapters.gguf_convert", description=__doc__)
    parser.add_argument("merged_dir", type=Path)
    parser.add_argument("adapter_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--name", default="model")
    args = parser.parse_args(argv)
    try:
        convert(args.merged_dir, args.adapter_dir, args.out_dir, name=args.name)
    except Exception as exc:  # noqa: BLE001 - reported on stderr for the caller
        print(f"GGUF export failed: {exc}", file=sys.stderr)  # noqa: T201
        # 2: this model cannot be GGUF (the API answers 400); 1: the conversion broke (503).
        return 2 if isinstance(exc, (GgufExportError, AdapterExportError)) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
