"""Training throughput of loraforge's own trainer path on the exact Llama architectures (issue 6).

    PYTHONPATH=src python bench/train_throughput.py --arch llama-3.1-8b --token-budget 16384
    PYTHONPATH=src python bench/train_throughput.py --arch llama-3.1-8b --baseline      # + naive, ratio
    PYTHONPATH=src python bench/train_throughput.py --arch llama-3.3-70b --layers 4,8 --strategy qlora
    PYTHONPATH=src python bench/train_throughput.py --arch llama-3.1-8b --kernels torch  # no Liger
    PYTHONPATH=src python bench/train_throughput.py --token-budget 8192 --ckpt-layers 16  # partial AC
    PYTHONPATH=src python bench/train_throughput.py --arch tiny --device cpu --steps 2  # CPU smoke

Builds a random-init ``LlamaForCausalLM`` with the exact Llama-3.1-8B (or Llama-3.3-70B) shapes on
the device (nothing downloaded), LoRA r=16 on all seven projections, and trains it on random token
ids whose document lengths follow ``../shared/bench/naive_lora_baseline.py`` (lognormal mu 6.1,
sigma 0.8, clipped 32..4096, seed 1; the definitions are imported from that file). Each step
takes the next documents up to ``--token-budget`` real tokens and runs them through the
trainer's own functions: ``packing.step_micro_batches`` (padding-free, restarting positions),
``loss.CausalLMLoss`` (chunked or fused linear CE), ``step.forward_backward``,
``device_setup.apply_kernels`` (``--kernels``: Liger RMSNorm/SwiGLU/RoPE on CUDA when it imports),
``device_setup.prepare_for_training`` / ``make_optimizer`` (bf16 autocast, fp32 LoRA, fused AdamW,
flex_attention, recompute on the first ``--ckpt-layers`` layers or all with ``--grad-ckpt``) and
the loop's gradient clipping.

Reported exactly as the naive baseline defines them: real tokens/s over the timed steps, peak GiB
= ``torch.cuda.max_memory_allocated`` over the timed steps, and LoRA-MFU = tokens/s *
(4 N_mm + 12 L h T_eff) / 989e12 with N_mm = L (2h^2 + 2h kv + 3h I) + h V and
T_eff = sum(len^2) / sum(len). ``--layers 4,8`` (70B) also extrapolates per-layer time and memory
linearly to 80 layers for one GPU (QLoRA) and per GPU under FSDP (weights / N).
Prints one JSON line per config and a final line starting with ``RESULT``.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from loraforge.contracts.train_spec import TrainPlan  # noqa: E402
from loraforge.contracts.trainer_launch import KERNEL_CHOICES  # noqa: E402
from loraforge.trainer.data import TokenizedExample  # noqa: E402
from loraforge.trainer.device_setup import (  # noqa: E402
    apply_kernels,
    attn_implementation,
    compute_dtype,
    make_optimizer,
    prepare_for_training,
)
from loraforge.trainer.loop import MAX_GRAD_NORM  # noqa: E402
from loraforge.trainer.loss import CausalLMLoss, resolve_loss_mode  # noqa: E402
from loraforge.trainer.packing import step_micro_batches  # noqa: E402
from loraforge.trainer.recipe import PACK_MULTIPLE_CUDA  # noqa: E402
from loraforge.trainer.recompute import decoder_layers  # noqa: E402
from loraforge.trainer.step import forward_backward  # noqa: E402

PEAK = 989e12  # H100/H200 SXM dense bf16 (PERF.md §0), as the baseline uses
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BASELINE_CANDIDATES = [
    os.environ.get("NAIVE_BASELINE", ""),
    str(ROOT.parent / "shared" / "bench" / "naive_lora_baseline.py"),
    str(ROOT / "shared" / "bench" / "naive_lora_baseline.py"),
    str(ROOT / "bench" / "naive_lora_baseline.py"),
]


def baseline_path() -> Path | None:
    """Where ``naive_lora_baseline.py`` is (``$NAIVE_BASELINE``, ``../shared/bench``, ...), if anywhere."""
    for candidate in BASELINE_CANDIDATES:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


def _load_baseline_module() -> Any | None:
    path = baseline_path()
    if path is None:
        return None
    spec = importlib.util.spec_from_file_location("naive_lora_baseline", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _doc_lengths_copy(n: int = 4000, seed: int = 1) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, generator=g)
    return [min(4096, max(32, int(math.exp(6.1 + 0.8 * x)))) for x in z.tolist()]


def _llama31_8b_copy(layers: int) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(  # type: ignore[call-arg]  # legacy rope kwargs, as the baseline passes them
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
        rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    )  # fmt: skip


# The baseline's own definitions when its file is here; otherwise the copies above (a unit test
# checks the copies are identical to the baseline's whenever that file is present).
_BASELINE = _load_baseline_module()
doc_lengths = _BASELINE.doc_lengths if _BASELINE is not None else _doc_lengths_copy
llama31_8b = _BASELINE.llama31_8b if _BASELINE is not None else _llama31_8b_copy


def make_config(arch: str, layers: int) -> Any:
    """The ``LlamaConfig`` of ``arch`` truncated to ``layers`` decoder layers."""
    cfg = llama31_8b(layers)
    if arch == "llama-3.3-70b":  # PERF.md §1: same rope/vocab/kv heads, wider and deeper
        cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads = 8192, 28672, 64
        cfg.head_dim = 128
    elif arch == "tiny":  # CPU smoke test only
        cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads = 64, 128, 4
        cfg.num_key_value_heads, cfg.head_dim, cfg.vocab_size = 2, 16, 1024
    return cfg


def n_mm(cfg: Any, layers: int) -> int:
    """Matmul params per token (blocks + lm_head), the baseline's formula (kv = kv_heads x head_dim)."""
    h, kv = cfg.hidden_size, cfg.num_key_value_heads * cfg.head_dim
    return layers * (2 * h * h + 2 * h * kv + 3 * h * cfg.intermediate_size) + h * cfg.vocab_size


def quantize_nf4(model: Any) -> None:
    """Replace the decoder's linear layers by bitsandbytes NF4 ones (double quant, bf16 compute).

    What ``BitsAndBytesConfig(load_in_4bit=True, ...)`` does at load time, applied to random weights
    already on the GPU (``from_pretrained`` would need a checkpoint on disk).
    """
    import bitsandbytes as bnb

    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if not isinstance(child, torch.nn.Linear):
                    continue
                q = bnb.nn.Linear4bit(
                    child.in_features, child.out_features, bias=False, compute_dtype=torch.bfloat16,
                    compress_statistics=True, quant_type="nf4", device="meta",
                )  # fmt: skip
                q.weight = bnb.nn.Params4bit(
                    child.weight.data, requires_grad=False, quant_type="nf4", compress_statistics=True
                )
                setattr(parent, name, q.to(child.weight.device))
                del child
    model.is_loaded_in_4bit = True


def build(args: argparse.Namespace, layers: int, device: torch.device) -> tuple[Any, Any, Any, Any, str]:
    """Model + LoRA set up by the trainer's functions: (peft model, loss module, opt, dtype, kernels)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import LlamaForCausalLM

    cfg = make_config(args.arch, layers)
    cfg._attn_implementation = args.attn or attn_implementation(device.type)
    base_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(base_dtype)  # init directly in bf16: no fp32 copy of 16 GB
    try:
        with device:
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(previous)
    plan = TrainPlan(
        strategy=args.strategy,
        token_budget=args.token_budget,
        gradient_checkpointing=args.grad_ckpt if args.ckpt_layers is None else args.ckpt_layers > 0,
        checkpoint_layers=args.ckpt_layers,
        packing=True,
        compile=args.compile,
        loss=args.loss,
    )
    if args.strategy == "qlora":
        quantize_nf4(model)
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=plan.gradient_checkpointing,  # prepare_for_training trims it
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    kernels = apply_kernels(model, device.type, args.kernels)  # before PEFT, as load_base does
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    dtype = compute_dtype(device.type, base_dtype, args.strategy)
    peft_model: Any = prepare_for_training(get_peft_model(model, lora), plan, device.type, dtype)
    peft_model.train()
    loss_module = CausalLMLoss(peft_model, resolve_loss_mode(plan.loss, device.type))
    params = [p for p in peft_model.parameters() if p.requires_grad]
    return peft_model, loss_module, make_optimizer(params, 1e-4, 0.0, device.type), dtype, kernels


def steps_of_docs(lengths: list[int], budget: int, vocab: int) -> Any:
    """Endless steps: the next documents up to ``budget`` real tokens (at least one), random ids."""
    g = torch.Generator().manual_seed(0)
    pos = 0
    while True:
        docs: list[TokenizedExample] = []
        used = 0
        while not docs or used + lengths[pos % len(lengths)] <= budget:
            n = lengths[pos % len(lengths)]
            ids = torch.randint(0, min(vocab, 128000), (n,), generator=g).tolist()
            docs.append(TokenizedExample(input_ids=ids, labels=ids))  # every token trained, as the baseline
            used += n
            pos += 1
        yield docs


def run_config(args: argparse.Namespace, layers: int) -> dict[str, Any]:
    """Build, warm up, time ``args.steps`` steps; the baseline's metrics for one layer count."""
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    model, loss_module, optimizer, dtype, kernels = build(args, layers, device)
    cfg = model.get_base_model().config
    ckpt = sum(bool(getattr(layer, "gradient_checkpointing", False)) for layer in decoder_layers(model))
    params = [p for p in model.parameters() if p.requires_grad]
    steps = steps_of_docs(doc_lengths(), args.token_budget, cfg.vocab_size)

    def one_step() -> list[int]:
        docs = next(steps)
        micro = step_micro_batches(
            docs, packing=True, token_budget=args.token_budget, pad_token_id=0,
            pad_to_multiple=PACK_MULTIPLE_CUDA if cuda else None,
        )  # fmt: skip
        forward_backward(
            loss_module, micro, device=device, backward=torch.Tensor.backward, compute_dtype=dtype
        )
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return [len(d.input_ids) for d in docs]

    for _ in range(args.warmup):
        one_step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0, done = time.time(), []
    for _ in range(args.steps):
        done += one_step()
    if cuda:
        torch.cuda.synchronize()
    dt = time.time() - t0
    tok = sum(done)
    t_eff = sum(n * n for n in done) / tok
    tps = tok / dt
    h, nmm = cfg.hidden_size, n_mm(cfg, layers)
    weights = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    result = {
        "config": f"loraforge_{args.arch}_L{layers}_{args.strategy}_tb{args.token_budget}"
        + ("" if not ckpt else "_ac" if ckpt == layers else f"_ac{ckpt}")
        + ("_compile" if args.compile else "")
        + ("_liger" if kernels == "liger" else ""),
        "layers": layers,
        "ckpt_layers": ckpt,  # read back from the layers' flags: what actually recomputed
        "real_tok_s": round(tps, 1),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1) if cuda else None,
        "lora_mfu": round(tps * (4 * nmm + 12 * layers * h * t_eff) / PEAK, 4),
        "step_s": round(dt / args.steps, 3),
        "s_per_tok": dt / tok,
        "tokens": tok,
        "t_eff": round(t_eff, 1),
        "n_mm": nmm,
        "frozen_weight_gib": round(weights / 2**30, 2),
        "loss_mode": loss_module.mode,
        "kernels": kernels,
        "attn": cfg._attn_implementation,
    }
    return result


def extrapolate(results: list[dict[str, Any]], arch: str, strategy: str, target: int = 80) -> dict[str, Any]:
    """Linear per-layer extrapolation from two truncated runs (t(80) = t4 + (t8 - t4) / 4 * 76)."""
    a, b = sorted(results, key=lambda r: r["layers"])[:2]
    per_layer = (target - a["layers"]) / (b["layers"] - a["layers"])
    spt = a["s_per_tok"] + (b["s_per_tok"] - a["s_per_tok"]) * per_layer
    out: dict[str, Any] = {"target_layers": target, "real_tok_s_per_gpu": round(1 / spt, 1)}
    cfg = make_config(arch, target)
    h, t_eff = cfg.hidden_size, b["t_eff"]
    out["lora_mfu"] = round((1 / spt) * (4 * n_mm(cfg, target) + 12 * target * h * t_eff) / PEAK, 4)
    if a["peak_gib"] is not None:
        peak = a["peak_gib"] + (b["peak_gib"] - a["peak_gib"]) * per_layer
        weights = a["frozen_weight_gib"] + (b["frozen_weight_gib"] - a["frozen_weight_gib"]) * per_layer
        out["peak_gib_one_gpu"] = round(peak, 1)
        out["frozen_weight_gib"] = round(weights, 1)
        if strategy == "lora":
            # FSDP shards the frozen weights; activations, LoRA and optimizer state stay per GPU
            # (plus ~2 gathered layers in flight, not counted).
            out["fsdp_peak_gib_per_gpu"] = {
                str(n): round(weights / n + (peak - weights), 1) for n in (2, 4, 8)
            }
    return out


def run_baseline(args: argparse.Namespace) -> dict[str, Any] | None:
    """The naive baseline in a subprocess on the same card; its RESULT dict (or None)."""
    path = baseline_path()
    if path is None:
        print("naive baseline not found (set NAIVE_BASELINE=.../naive_lora_baseline.py)", file=sys.stderr)
        return None
    env = {**os.environ, "LAYERS": str(args.layers.split(",")[0]), "BATCHES": "8", "STEPS": "8"}
    proc = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, env=env, check=False)
    sys.stderr.write(proc.stderr[-4000:])
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            result: dict[str, Any] = json.loads(line[len("RESULT ") :])
            return result
    return None


def main(argv: list[str] | None = None) -> int:
    """Parse options, run the configs, print JSON lines and the RESULT line."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", choices=["llama-3.1-8b", "llama-3.3-70b", "tiny"], default="llama-3.1-8b")
    parser.add_argument("--layers", default=None, help="decoder layers, or two counts '4,8' to extrapolate")
    parser.add_argument(
        "--token-budget", type=int, default=None, help="real tokens per step (16384; tiny 2048)"
    )
    parser.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing (all layers)")
    parser.add_argument("--ckpt-layers", type=int, default=None, help="recompute only the first K layers")
    parser.add_argument("--compile", action="store_true", help="torch.compile each decoder layer (CUDA)")
    parser.add_argument("--strategy", choices=["lora", "qlora"], default="lora")
    parser.add_argument("--loss", choices=["auto", "chunked", "full"], default="auto")
    parser.add_argument(
        "--kernels",
        choices=KERNEL_CHOICES,
        default=os.environ.get("LORAFORGE_KERNELS") or "auto",
        help="RMSNorm/SwiGLU/RoPE: auto = Liger on CUDA when it imports (default: $LORAFORGE_KERNELS)",
    )
    parser.add_argument("--attn", default=None, help="override the attention implementation")
    parser.add_argument(
        "--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=None, help="default 2 (4 with --compile)")
    parser.add_argument(
        "--baseline", action="store_true", help="also run the naive baseline, print the ratio"
    )
    args = parser.parse_args(argv)
    default_layers = {"llama-3.1-8b": "32", "llama-3.3-70b": "4,8", "tiny": "2"}[args.arch]
    args.layers = args.layers or default_layers
    args.token_budget = args.token_budget or (2048 if args.arch == "tiny" else 16384)
    args.warmup = args.warmup if args.warmup is not None else (4 if args.compile else 2)
    if args.grad_ckpt and args.ckpt_layers == 0:
        parser.error("--grad-ckpt contradicts --ckpt-layers 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")

    out: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
        "arch": args.arch,
        "strategy": args.strategy,
        "token_budget": args.token_budget,
        "grad_ckpt": args.grad_ckpt,
        "ckpt_layers": args.ckpt_layers,
        "compile": args.compile,
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "peft": __import__("peft").__version__,
        "configs": [],
    }
    if args.baseline and args.device == "cuda":
        # First, while this process holds no GPU memory: the baseline gets the card to itself.
        out["baseline"] = run_baseline(args)
    for layers in [int(x) for x in args.layers.split(",")]:
        try:
            result = run_config(args, layers)
        except torch.OutOfMemoryError:
            result = {"layers": layers, "oom": True}
        # Free this config's model before the next one (peak memory is per config).
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()
        print(json.dumps(result), flush=True)
        out["configs"].append(result)
    measured = [r for r in out["configs"] if not r.get("oom")]
    if len(measured) >= 2:
        out["extrapolated"] = extrapolate(measured, args.arch, args.strategy)
        print(json.dumps({"extrapolated": out["extrapolated"]}), flush=True)
    naive = (out.get("baseline") or {}).get("naive_padded_bs8_ac", {})
    if measured and naive.get("real_tok_s"):
        out["ratio_vs_naive_bs8"] = round(measured[0]["real_tok_s"] / naive["real_tok_s"], 2)
    print("RESULT " + json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
