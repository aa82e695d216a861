"""Serving adapters: cold/resident hot-load to first token, and decode throughput with 1, 4 and 8
distinct adapters in flight against the base model alone, measured in the same run.

    # CPU, the tiny model (what docs/benchmarks.md reports for CPU):
    python bench/serve_adapters.py
    # GPU, the Llama-3.1-8B architecture with random weights and synthetic r=16 adapters
    # (nothing is downloaded; the tokenizer is tiny-llama's, whose ids are a subset of the vocab):
    python bench/serve_adapters.py --arch llama-3.1-8b --device cuda --dtype bfloat16
    # CPU smoke test of the 8B code path with 1 layer:
    python bench/serve_adapters.py --arch llama-3.1-8b --num-layers 1 --max-tokens 8 --repeats 1

Everything runs in-process through :class:`loraforge.serving.engine.Engine` (its batching
scheduler, the grouped LoRA slots, the LRU), not over HTTP. Decode throughput is measured for both
of the engine's mixed-batch paths in the same run, each mix alternating between them: ``grouped``
(slot-stacked LoRA, one gather + two bmm per layer) and ``peft`` (PEFT's ``adapter_names`` loop,
``Engine(grouped_lora=False)``); ``--paths`` picks one. The reference for every ratio is the bare
base model (no adapter loaded, so no LoRA layers at all), timed before the adapters are loaded and
again after they are unloaded.

Adapters are synthetic: random A and B (std ``--lora-std``) on all seven linear projections,
written to disk with a manifest like the trainer's; before each cold load the adapter files are
dropped from the page cache (``posix_fadvise(DONTNEED)``, best effort), so "cold" reads them from
storage.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from loraforge.adapters.format import AdapterManifest, LoraSettings, write_manifest
from loraforge.catalog import load_catalog
from loraforge.catalog.catalog import LLAMA_LINEAR_MODULES, BaseModelEntry
from loraforge.catalog.loading import load_model, load_tokenizer
from loraforge.serving.engine import Engine, GenerationRequest

# Llama-3.1-8B (PERF.md §1).
LLAMA_8B = {
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 131072,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}
# (label, distinct adapters (0: base), most rows per generate call (0: all in flight)).
MIXES = (
    ("base rows, 8 adapters resident", 0, 0),
    ("1 adapter", 1, 0),
    ("4 adapters", 4, 0),
    ("8 adapters", 8, 0),
    ("8 adapters, no batching", 8, 1),  # what batching buys: one request per generate call
)


def build_base(args: argparse.Namespace, work: Path) -> tuple[Any, Any, BaseModelEntry]:
    """The base model, a tokenizer and a catalog entry for it."""
    tiny = load_catalog().get("loraforge/tiny-llama")
    assert tiny is not None
    tokenizer = load_tokenizer(tiny, work / "models")
    dtype = getattr(torch, args.dtype)
    if args.arch == "tiny":
        model = load_model(tiny, work / "models", device=args.device, dtype=args.dtype)
        return model.eval(), tokenizer, tiny
    from transformers import LlamaConfig, LlamaForCausalLM

    layers = args.num_layers or LLAMA_8B["num_hidden_layers"]
    config = LlamaConfig(
        **{**LLAMA_8B, "num_hidden_layers": layers}, bos_token_id=0, eos_token_id=4, pad_token_id=5
    )
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(args.device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    entry = tiny.model_copy(
        update={"id": "bench/llama-3.1-8b-random", "aliases": [], "weights": "random", "context_length": 8192}
    )
    return model.eval(), tokenizer, entry


def write_adapters(
    model: Any, entry: BaseModelEntry, n: int, args: argparse.Namespace, root: Path
) -> list[Path]:
    """``n`` synthetic LoRA adapters (PEFT pair + manifest) for ``model``; the model is left bare."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=args.rank,
        lora_alpha=2 * args.rank,
        target_modules=list(LLAMA_LINEAR_MODULES),
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    dirs = []
    for i in range(n):
        generator = torch.Generator(device="cpu").manual_seed(1000 + i)
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if ".lora_" in name:
                    noise = torch.randn(param.shape, generator=generator) * args.lora_std
                    param.copy_(noise.to(param.dtype))
        out = root / f"adapter-{i}"
        peft_model.save_pretrained(out)
        (out / "README.md").unlink(missing_ok=True)
        write_manifest(
            out,
            AdapterManifest(
                job_id=f"bench-{i}",
                base_model=entry.id,
                base_weights=entry.weights,
                chat_template=entry.chat_template_text,
                stop_tokens=list(entry.stop_tokens),
                lora=LoraSettings(
                    r=args.rank, alpha=2 * args.rank, dropout=0.0, target_modules=list(LLAMA_LINEAR_MODULES)
                ),
                hyperparameters={},
            ),
        )
        dirs.append(out)
    peft_model.unload()  # strips the LoRA layers from ``model`` again
    return dirs


def drop_page_cache(folder: Path) -> None:
    """Ask the kernel to forget ``folder``'s files (so the next read comes from storage)."""
    for path in folder.iterdir():
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        except (OSError, AttributeError):
            pass


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def messages(prompt_words: int, i: int = 0) -> list[dict[str, str]]:
    words = " ".join(f"w{(i * 7 + k) % 97}" for k in range(prompt_words))
    return [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": words}]


def no_stop(request: GenerationRequest, max_tokens: int) -> GenerationRequest:
    """Exactly ``max_tokens`` tokens: random weights may emit an eos at any point."""
    return replace(request, eos_ids=(), stop=(), max_new_tokens=max_tokens)


def time_to_first_token(engine: Engine, args: argparse.Namespace, dirs: list[Path]) -> dict[str, Any]:
    """(a) load request -> first token for never-loaded adapters, then for resident ones."""
    prompt = messages(args.prompt_words)
    cold, loads, resident, base = [], [], [], []
    for i in range(args.cold):
        name = f"cold-{i}"
        drop_page_cache(dirs[i])
        sync(args.device)
        start = time.perf_counter()
        engine.load_adapter(name, dirs[i])
        loaded = time.perf_counter()
        engine.run(no_stop(engine.prepare(name, prompt, temperature=0), 1))
        sync(args.device)
        done = time.perf_counter()
        cold.append(done - start)
        loads.append(loaded - start)
    for _ in range(args.repeats * 3):
        for target, sink in ((f"cold-{args.cold - 1}", resident), (entry_id(engine), base)):
            sync(args.device)
            start = time.perf_counter()
            engine.run(no_stop(engine.prepare(target, prompt, temperature=0), 1))
            sync(args.device)
            sink.append(time.perf_counter() - start)
    for i in range(args.cold):
        engine.unload_adapter(f"cold-{i}")
    ms = lambda xs: round(1000 * statistics.median(xs), 2)  # noqa: E731
    return {
        "cold_load_to_first_token_ms": ms(cold),
        "cold_load_only_ms": ms(loads),
        "resident_first_token_ms": ms(resident),
        "base_first_token_ms": ms(base),
        "prompt_tokens": len(engine.prepare(entry_id(engine), prompt).input_ids),
        "samples": {"cold": len(cold), "resident": len(resident)},
    }


def entry_id(engine: Engine) -> str:
    return engine.entry.id


def time_decode(
    engine: Engine, args: argparse.Namespace, models: list[str], batch_cap: int
) -> dict[str, float]:
    """Decode tok/s for ``--concurrency`` requests in flight, request i for ``models[i]``."""
    engine.scheduler.max_batch_size = batch_cap or max(8, args.concurrency)
    prepared = [
        engine.prepare(m, messages(args.prompt_words, i), temperature=0) for i, m in enumerate(models)
    ]

    def run(max_tokens: int) -> float:
        sync(args.device)
        start = time.perf_counter()
        results = engine.run_many([no_stop(r, max_tokens) for r in prepared])
        sync(args.device)
        assert all(r.completion_tokens == max_tokens for r in results)
        return time.perf_counter() - start

    run(2)  # warm-up
    before = engine.scheduler.batches_run
    prefill = statistics.median(run(1) for _ in range(args.repeats))
    full = statistics.median(run(args.max_tokens) for _ in range(args.repeats))
    batches = (engine.scheduler.batches_run - before) / (2 * args.repeats)
    engine.scheduler.max_batch_size = max(8, args.concurrency)
    return {
        "batches_per_round": batches,
        "end_to_end_tok_s": round(args.concurrency * args.max_tokens / full, 1),
        "decode_tok_s": round(args.concurrency * (args.max_tokens - 1) / max(full - prefill, 1e-9), 1),
    }


def decode_throughput(engine: Engine, args: argparse.Namespace, dirs: list[Path]) -> list[dict[str, Any]]:
    """(b) ``--concurrency`` requests in flight, spread over 0 (base), 1, 4 or 8 distinct adapters.

    Each mix is timed once per path in ``--paths``, alternately, on the same resident adapters.
    """
    assert not engine.loaded_adapters()  # the bare base first: no LoRA layers in the model
    base_models = [entry_id(engine)] * args.concurrency
    bare = [time_decode(engine, args, base_models, 0)]
    names = [f"tp-{i}" for i in range(8)]
    for name, folder in zip(names, dirs, strict=False):
        engine.load_adapter(name, folder)
    rows = []
    for label, n_adapters, batch_cap in MIXES:
        models = [names[i % n_adapters] if n_adapters else entry_id(engine) for i in range(args.concurrency)]
        for path in args.paths:
            engine.grouped_lora = path == "grouped"
            rows.append({"mix": label, "path": path, **time_decode(engine, args, models, batch_cap)})
    engine.grouped_lora = True
    for name in names:
        engine.unload_adapter(name)
    bare.append(time_decode(engine, args, base_models, 0))
    reference = statistics.mean(b["decode_tok_s"] for b in bare)
    rows.insert(
        0,
        {
            "mix": "bare base (no adapter loaded)",
            "path": "-",
            "batches_per_round": 1,
            "end_to_end_tok_s": round(statistics.mean(b["end_to_end_tok_s"] for b in bare), 1),
            "decode_tok_s": round(reference, 1),
            "bare_base_decode_tok_s_before_after": [b["decode_tok_s"] for b in bare],
        },
    )
    for row in rows:
        row["requests_in_flight"] = args.concurrency
        row["vs_base"] = round(row["decode_tok_s"] / reference, 3)
    return rows


def environment(args: argparse.Namespace) -> dict[str, Any]:
    import peft
    import transformers

    gpu = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", choices=["tiny", "llama-3.1-8b"], default="tiny")
    parser.add_argument("--num-layers", type=int, default=0, help="override the layer count (smoke tests)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lora-std", type=float, default=0.02)
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight for (b)")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens generated per request in (b)")
    parser.add_argument("--prompt-words", type=int, default=24)
    parser.add_argument("--cold", type=int, default=3, help="never-loaded adapters timed in (a)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--paths",
        nargs="+",
        choices=["grouped", "peft"],
        default=["grouped", "peft"],
        help="mixed-batch paths to time in (b): grouped LoRA slots and/or PEFT's adapter_names loop",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="lf-bench-") as tmp:
        work = Path(tmp)
        started = time.perf_counter()
        model, tokenizer, entry = build_base(args, work)
        built = time.perf_counter()
        dirs = write_adapters(model, entry, max(8, args.cold) + args.cold, args, work / "adapters")
        engine = Engine(
            model,
            tokenizer,
            entry,
            max_loaded_adapters=32,
            max_batch_size=max(8, args.concurrency),
            batch_window_s=0.002,
        )
        try:
            ttft = time_to_first_token(engine, args, dirs[8:])
            throughput = decode_throughput(engine, args, dirs[:8])
        finally:
            engine.close()
        result = {
            "arch": args.arch,
            "layers": model.config.num_hidden_layers,
            "params": sum(p.numel() for p in model.parameters()),
            "device": args.device,
            "dtype": args.dtype,
            "lora_rank": args.rank,
            "adapter_bytes": (dirs[0] / "adapter_model.safetensors").stat().st_size,
            "base_build_s": round(built - started, 2),
            "time_to_first_token": ttft,
            "decode_throughput": throughput,
            "environment": environment(args),
        }
    print(json.dumps(result, indent=2))
    print("\n| mix | path | requests in flight | batches/round | end-to-end tok/s | decode tok/s | vs base |")
    print("|---|---|---|---|---|---|---|")
    for row in throughput:
        print(
            f"| {row['mix']} | {row['path']} | {row['requests_in_flight']} | "
            f"{row['batches_per_round']:.0f} | {row['end_to_end_tok_s']} | {row['decode_tok_s']} | "
            f"{row['vs_base']:.2f} |"
        )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
